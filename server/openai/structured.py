"""`response_format` json_object / json_schema: decoding constrained by llguidance.

The grammar (from the JSON schema) becomes an `LLMatcher`; before each token the
processor masks every token the grammar forbids to -inf, and after it advances the
matcher with the sampled token. The request ends ("stop") once the matcher has accepted
a complete value, so the output parses and validates.

Whitespace between tokens of the JSON is free but bounded (`WHITESPACE_PATTERN`); none is
allowed before the value or after it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import torch

from server.http.errors import bad_request
from server.openai.schemas import ResponseFormat

logger = logging.getLogger(__name__)

# The whitespace JSON serializers write is allowed: none, one space (`{"a": 1, "b": 2}`), or a
# line break and indentation (pretty-printed). Forcing compact JSON on a model trained to write
# `": "` pushes it off the text it knows and into garbage. Each run is bounded, so a weak model
# cannot spend its whole budget on blanks.
MAX_INDENT_SPACES = 24
MAX_INDENT_TABS = 8
WHITESPACE_PATTERN = rf"(?:\x20|\r?\n(?:\x20{{0,{MAX_INDENT_SPACES}}}|\t{{0,{MAX_INDENT_TABS}}}))"
_COMPILE_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": WHITESPACE_PATTERN}
_ANY_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


class JSONLogitsProcessor:
    """A `LogitsProcessor` (engine/logits_processor.py) driven by an llguidance matcher."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size  # tokens the matcher knows; ids past it are never allowed
        self._shifts = torch.arange(32, dtype=torch.int32)
        self.bitmask_words = (vocab_size + 31) // 32

    def fill_bitmask(self, bitmask: torch.Tensor, index: int) -> None:
        """Row `index` of the step's host bitmask (the engine applies all rows at once)."""
        import llguidance.torch

        llguidance.torch.fill_next_token_bitmask(self._matcher, bitmask, index)

    def allowed_mask(self) -> torch.Tensor:
        """Bool [vocab_size]: which tokens may come next."""
        words = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.int32)
        bits = (words.unsqueeze(1) >> self._shifts) & 1
        return bits.flatten()[: self._vocab_size].bool()

    def apply(self, logits: torch.Tensor) -> None:
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
        width = min(self._vocab_size, logits.shape[-1])
        allowed[:width] = self.allowed_mask()[:width]
        logits.masked_fill_(~allowed.to(logits.device), float("-inf"))

    def accept(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            logger.warning("structured output: token %d rejected: %s", token_id, self._matcher.get_error())

    def is_finished(self) -> bool:
        return bool(self._matcher.is_stopped() or self._matcher.is_error())


class StructuredOutputs:
    """Compiles response formats for one tokenizer (its llguidance form is built once)."""

    def __init__(self, tokenizer: Any, eos_token_ids: set[int] | None = None) -> None:
        self._hf_tokenizer = tokenizer
        self._eos = sorted(eos_token_ids or [])
        self._ll_tokenizer: Any = None
        self._lock = threading.Lock()

    def _tokenizer(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                eos: int | list[int] | None = self._eos or None
                self._ll_tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, eos_token=eos)
            return self._ll_tokenizer

    @staticmethod
    def schema_of(response_format: ResponseFormat | None) -> dict[str, Any] | None:
        """The JSON schema a response format asks for; None for plain text."""
        if response_format is None or response_format.type == "text":
            return None
        if response_format.type == "json_object":
            return _ANY_OBJECT_SCHEMA
        assert response_format.json_schema is not None  # checked by the schema model
        schema = response_format.json_schema.schema_
        return schema if schema is not None else _ANY_OBJECT_SCHEMA

    def compile(self, schema: dict[str, Any]) -> Any:
        """A fresh matcher for `schema`; 400 naming response_format when it cannot be compiled.

        Slow for big schemas (llguidance releases the GIL): call it from a worker thread.
        """
        import llguidance

        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_COMPILE_OPTIONS)
        except (ValueError, TypeError) as exc:
            raise bad_request(f"Invalid JSON schema: {exc}", param="response_format") from None
        return self.matcher(grammar, "Unsupported JSON schema", "response_format")

    def matcher(self, grammar: str, refusal: str, param: str) -> Any:
        """A fresh matcher for a compiled llguidance `grammar`; a 400 (`refusal`: why, naming
        `param`) when the grammar cannot run on this tokenizer."""
        import llguidance

        tokenizer = self._tokenizer()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise bad_request(f"{refusal}: {'; '.join(messages)}", param=param)
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise bad_request(f"{refusal}: {matcher.get_error()}", param=param)
        return matcher

    def processors(self, schema: dict[str, Any], count: int) -> list[JSONLogitsProcessor]:
        """One processor per choice, sharing one compiled grammar."""
        return self.processors_for(self.compile(schema), count)

    def processors_for(self, matcher: Any, count: int) -> list[JSONLogitsProcessor]:
        """One processor per choice: `matcher` for the first, copies of it for the others."""
        vocab_size = self._tokenizer().vocab_size
        return [JSONLogitsProcessor(matcher if i == 0 else matcher.deep_copy(), vocab_size)
                for i in range(count)]
