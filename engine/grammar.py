"""Constrained decoding from a grammar given as data: llguidance grammar text in, a per-request
logits processor out.

A request carries its grammar as text (what `llguidance.LLMatcher.grammar_from_json_schema` or
`grammar_from_lark` return; the server builds and checks it), so nothing live crosses from the
server to the engine. `Grammars` compiles each text once for this engine's tokenizer (a small
LRU of compiled matchers) and hands every request its own copy; `GrammarProcessor` is the
`BitmaskLogitsProcessor` (engine/logits_processor.py) the sampler batches: before each token its
allowed-token bitmask, after it the sampled token advances the matcher. The request ends
("stop") once the matcher has accepted a complete value.

Compiling a large grammar takes time (llguidance releases the GIL): callers build processors
on a worker thread, never on the event loop or the engine thread.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

import torch

logger = logging.getLogger(__name__)

CACHED_GRAMMARS = 64


class GrammarProcessor:
    """One request's grammar state: an llguidance matcher over the engine's tokenizer."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size  # tokens the matcher knows; ids past it are never allowed
        self.bitmask_words = (vocab_size + 31) // 32
        self._shifts = torch.arange(32, dtype=torch.int32)

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        """Row `index` of the step's host bitmask (the sampler applies all rows at once)."""
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, index)

    def allowed_mask(self) -> torch.Tensor:
        """Bool [vocab_size]: which tokens may come next."""
        words = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.int32)
        bits = (words.unsqueeze(1) >> self._shifts) & 1
        return bits.flatten()[: self._vocab_size].bool()

    def apply(self, logits: torch.Tensor) -> None:
        """The same mask on one row (callers without the sampler's batching)."""
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
        width = min(self._vocab_size, logits.shape[-1])
        allowed[:width] = self.allowed_mask()[:width]
        logits.masked_fill_(~allowed.to(logits.device), float("-inf"))

    def accept(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            logger.warning("grammar: token %d rejected: %s", token_id, self._matcher.get_error())

    def is_finished(self) -> bool:
        return bool(self._matcher.is_stopped() or self._matcher.is_error())


class Grammars:
    """Per-request processors from grammar text, for one Hugging Face tokenizer (its llguidance
    form is built on first use); thread-safe."""

    def __init__(self, tokenizer: Any, eos_token_ids: set[int] | None = None) -> None:
        self._hf_tokenizer = tokenizer
        self._eos = sorted(eos_token_ids or [])
        self._ll_tokenizer: Any = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def tokenizer(self) -> Any:
        """The llguidance tokenizer (built once: it reads the whole vocabulary)."""
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                eos: int | list[int] | None = self._eos or None
                self._ll_tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, eos_token=eos)
            return self._ll_tokenizer

    def processor(self, grammar: str) -> GrammarProcessor:
        """A fresh processor for `grammar`; ValueError when it cannot run on this tokenizer."""
        import llguidance

        tokenizer = self.tokenizer()
        with self._lock:
            template = self._compiled.get(grammar)
            if template is not None:
                self._compiled.move_to_end(grammar)
        if template is None:
            template = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
            if template.is_error():
                raise ValueError(f"grammar: {template.get_error()}")
            with self._lock:
                self._compiled[grammar] = template
                while len(self._compiled) > CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
        return GrammarProcessor(template.deep_copy(), tokenizer.vocab_size)
