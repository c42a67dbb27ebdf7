"""`response_format` json_object / json_schema: decoding constrained by llguidance.

The JSON schema becomes llguidance grammar text, checked here against the tokenizer (a bad
schema is a 400 naming `response_format`) and handed to the engine as data; the engine builds
each choice's matcher from it (engine/grammar.py), masks every token the grammar forbids and
ends the choice ("stop") once a complete value is accepted, so the output parses and validates.

Whitespace between tokens of the JSON is free but bounded (`WHITESPACE_PATTERN`); none is
allowed before the value or after it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

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
        return self.matcher(_schema_grammar(schema), "Unsupported JSON schema", "response_format")

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

    def grammar_of(self, schema: dict[str, Any]) -> str:
        """The checked grammar text for `schema`, what the engine is given; 400 naming
        response_format when it cannot be compiled or run on this tokenizer. Slow for big
        schemas: call it from a worker thread."""
        grammar = _schema_grammar(schema)
        self.matcher(grammar, "Unsupported JSON schema", "response_format")
        return grammar


def _schema_grammar(schema: dict[str, Any]) -> str:
    import llguidance

    try:
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_COMPILE_OPTIONS)
    except (ValueError, TypeError) as exc:
        raise bad_request(f"Invalid JSON schema: {exc}", param="response_format") from None
