"""Logprobs of a prompt's own tokens, from the hidden states its prefill computed anyway.

A step needs logits only at each sequence's last position. A request that scores its prompt
(`SamplingParams.prompt_logprobs`) also needs them at every other position: position i's
logits give the logprob of prompt token i + 1. The raw log-softmax (float32, as the sampler's)
is taken over `_CHUNK_ELEMENTS // vocab` positions at a time, so a long prompt over a large
vocabulary never holds a [prompt, vocab] tensor; what stays is a few numbers per position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.outputs import TokenLogprob
from engine.sampler import to_host

# float32 logits per chunk (64 MiB); the chunk's log-softmax and comparisons take a few times that.
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class PromptScores:
    """Per scored position j (predicting token j + 1), on the device."""

    chosen: torch.Tensor  # [n] float32: logprob of the token that follows
    ranks: torch.Tensor  # [n] int64: 1 + how many tokens are strictly likelier
    top_values: torch.Tensor  # [n, k] float32, descending
    top_ids: torch.Tensor  # [n, k] int64


def score_positions(
    compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
    k: int, vocab_size: int,
) -> PromptScores:  # fmt: skip
    """Scores of `targets[j]` under the logits of `hidden[j]`, with the top `k` alternatives.

    `compute_logits` maps hidden rows to [rows, vocab_size] logits (a collective under tensor
    parallelism: every rank calls it with the same chunks).
    """
    n, device = hidden.shape[0], hidden.device
    k = min(k, vocab_size)
    scores = PromptScores(
        chosen=torch.empty(n, dtype=torch.float32, device=device),
        ranks=torch.empty(n, dtype=torch.int64, device=device),
        top_values=torch.empty(n, k, dtype=torch.float32, device=device),
        top_ids=torch.empty(n, k, dtype=torch.int64, device=device),
    )
    rows = max(1, _CHUNK_ELEMENTS // vocab_size)
    for start in range(0, n, rows):
        end = min(n, start + rows)
        logprobs = compute_logits(hidden[start:end]).float().log_softmax(dim=-1)
        chosen = logprobs.gather(1, targets[start:end].unsqueeze(1))
        scores.chosen[start:end] = chosen.squeeze(1)
        scores.ranks[start:end] = (logprobs > chosen).sum(dim=-1) + 1
        if k:
            values, ids = logprobs.topk(k, dim=-1)
            scores.top_values[start:end] = values
            scores.top_ids[start:end] = ids
        del logprobs
    return scores


class PendingPromptLogprobs:
    """One request's prompt scores on their way to the host (two copies, waited for in `result`)."""

    def __init__(self, scores: PromptScores) -> None:
        on_cuda = scores.chosen.is_cuda
        ints = torch.cat([scores.ranks.unsqueeze(1), scores.top_ids], dim=1)
        floats = torch.cat([scores.chosen.unsqueeze(1), scores.top_values], dim=1)
        self._ints = to_host(ints, on_cuda)
        self._floats = to_host(floats, on_cuda)
        self._ready: torch.cuda.Event | None = None
        if on_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record()

    def result(self, prompt_token_ids: list[int]) -> list[TokenLogprob | None]:
        """One entry per prompt token: None for the first, then each token's logprob."""
        if self._ready is not None:
            self._ready.synchronize()
        ints, floats = self._ints.tolist(), self._floats.tolist()
        if len(ints) != len(prompt_token_ids) - 1:
            raise ValueError(f"{len(ints)} scored positions for a prompt of {len(prompt_token_ids)} tokens")
        out: list[TokenLogprob | None] = [None]
        for token_id, int_row, float_row in zip(prompt_token_ids[1:], ints, floats, strict=True):
            top = list(zip(int_row[1:], float_row[1:], strict=True))
            out.append(TokenLogprob(token_id=token_id, logprob=float_row[0], top=top, rank=int_row[0]))
        return out
