"""The hook through which constrained decoding (and similar) steers sampling."""

from __future__ import annotations

from typing import Protocol

import torch


class LogitsProcessor(Protocol):
    """Per-request state machine that restricts the next token.

    The engine calls `apply` on the request's logits row (shape [vocab], float32) before
    sampling, in the engine thread, then `accept` with the sampled token. When
    `is_finished()` turns true the request ends with finish_reason "stop".
    """

    def apply(self, logits: torch.Tensor) -> None: ...

    def accept(self, token_id: int) -> None: ...

    def is_finished(self) -> bool: ...
