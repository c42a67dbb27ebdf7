"""What the engine hands back per request and per step: plain data."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Logprob of one generated token and its top alternatives (raw log-softmax)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None  # prompt logprobs: 1 + the number of tokens the model found likelier


@dataclass
class RequestDelta:
    """One step's worth of output for one request.

    `token_ids` are the tokens sampled this step (usually one); `text` is the newly
    releasable text (may be empty while a multi-byte character or a possible stop string
    is held back). `finish_reason` is set on the last delta: "stop" or "length", or
    "abort" / "error" (with `error`).
    """

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    queue_time: float | None = None  # on the first delta: seconds the request waited to be scheduled
    # On the first delta of a request that asked for them: one entry per prompt token, the
    # first None (nothing precedes it), the others that token's logprob given the ones before.
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
