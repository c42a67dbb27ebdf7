"""Greedy outputs compared token by token, with near-ties accepted (the soak's `--tie-tolerance`).

On a GPU in bf16 a request's logits depend slightly on what else is in its batch (the matmul
kernels differ with the batch size), so where the two best tokens are almost tied the greedy
choice can flip, and the text after it legitimately differs from the reference taken alone.
A greedy answer is accepted against its reference when both token lists agree up to some
index i and, at i, the reference's top alternatives hold the token the answer chose with a
logprob at most `tolerance` nats below the reference's own choice. What follows i is not
compared. Tokens are compared by the strings the API returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# Alternatives asked for per position: as many as each endpoint allows, so a divergence on a flat
# distribution (random weights: hundreds of tokens within a tenth of a nat) can still be judged.
TOP_LOGPROBS = 20  # chat's limit
COMPLETION_TOP_LOGPROBS = 5  # the legacy endpoint's limit


@dataclass(frozen=True)
class Step:
    """One generated token: its string, its logprob, and the top alternatives {token: logprob}."""

    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Match:
    """`outcome` is "equal" (same tokens), "near_tie" (accepted divergence) or "mismatch"."""

    outcome: str
    index: int | None = None
    gap: float | None = None
    detail: str = ""


def compare_greedy(reference: Sequence[Step], got: Sequence[Step], tolerance: float) -> Match:
    for i, (want, have) in enumerate(zip(reference, got, strict=False)):
        if want.token == have.token:
            continue
        where = f"token {i}: got {have.token!r}, reference {want.token!r} (logprob {want.logprob:.4f})"
        alternative = want.top.get(have.token)
        if alternative is None:
            return Match(
                "mismatch",
                i,
                None,
                f"{where}; {have.token!r} is not among the reference's top {len(want.top)} alternatives",
            )
        gap = want.logprob - alternative
        if gap > tolerance:
            return Match(
                "mismatch",
                i,
                gap,
                f"{where}; the reference gives it {alternative:.4f}, "
                f"{gap:.4f} nats below, beyond the tolerance {tolerance}",
            )
        return Match(
            "near_tie", i, gap, f"{where}; the reference gives it {alternative:.4f}, {gap:.4f} nats below"
        )
    if len(reference) != len(got):
        return Match(
            "mismatch",
            min(len(reference), len(got)),
            None,
            f"{len(got)} tokens, reference {len(reference)}, the same up to the shorter",
        )
    return Match("equal", detail=f"the same {len(got)} tokens")


def _resolved(token: str, logprob: float, top: dict[str, float]) -> str:
    """The API shows the EOS that ended a choice as "" (its text is not in the output); its string
    is the one alternative with exactly the chosen logprob (both come from the same log-softmax)."""
    if token:
        return token
    same = [t for t, value in top.items() if value == logprob]
    return same[0] if len(same) == 1 else token


def _step(token: str, logprob: float, top: dict[str, float]) -> Step:
    return Step(_resolved(token, logprob, top), logprob, top)


def chat_steps(logprobs: Any) -> list[Step]:
    """Steps from a chat choice's (or chunk choice's) `logprobs` object; [] when there is none."""
    content = getattr(logprobs, "content", None) or []
    steps = []
    for item in content:
        top: dict[str, float] = {}
        for alt in item.top_logprobs or []:
            top[alt.token] = max(alt.logprob, top.get(alt.token, alt.logprob))
        steps.append(_step(item.token, item.logprob, top))
    return steps


def completion_steps(logprobs: Any) -> list[Step]:
    """Steps from a legacy choice's `logprobs` object (parallel lists); [] when there is none."""
    if logprobs is None:
        return []
    tokens = logprobs.tokens or []
    values = logprobs.token_logprobs or []
    tops = logprobs.top_logprobs or []
    return [
        _step(token, value, dict(tops[i] or {}) if i < len(tops) else {})
        for i, (token, value) in enumerate(zip(tokens, values, strict=False))
    ]


def steps_of(endpoint: str, logprobs: Any) -> list[Step]:
    return chat_steps(logprobs) if endpoint == "chat" else completion_steps(logprobs)


def logprob_args(endpoint: str) -> dict[str, Any]:
    """Request arguments that ask for the chosen tokens' logprobs and their top alternatives."""
    return (
        {"logprobs": True, "top_logprobs": TOP_LOGPROBS} if endpoint == "chat" else {"logprobs": COMPLETION_TOP_LOGPROBS}
    )
