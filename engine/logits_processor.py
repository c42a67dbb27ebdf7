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


class BitmaskLogitsProcessor(LogitsProcessor, Protocol):
    """A processor whose restriction is an allowed-token bitmask (a grammar). The sampler asks
    every such row of a step for its mask on the host (`fill_bitmask`: bit t of word t // 32 of
    `bitmask[index]`, int32, set when token t may come next) and applies them all on the device
    at once; `apply` is then not called."""

    bitmask_words: int  # words per row: ceil(vocabulary the mask covers / 32)

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None: ...
