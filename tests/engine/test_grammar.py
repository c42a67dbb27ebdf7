"""Grammars given as text (engine/grammar.py): each request gets its own matcher, masks what the
grammar forbids, finishes with a complete value; a bitmask row equals the processor's mask."""

from __future__ import annotations

import llguidance
import pytest
import torch

from engine.grammar import GrammarProcessor, Grammars
from tests.factories import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _schema(schema: dict) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(schema)


def test_a_processor_masks_and_finishes(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    processor = Grammars(tokenizer, {eos}).processor(_schema({"enum": ["over"]}))
    assert isinstance(processor, GrammarProcessor)
    vocab = len(tokenizer) + 7  # model vocabularies are often padded past the tokenizer's
    for token_id in tokenizer.encode('"over"', add_special_tokens=False):
        logits = torch.zeros(vocab)
        processor.apply(logits)
        allowed = torch.isfinite(logits)
        assert allowed[token_id] and not allowed[len(tokenizer):].any()
        assert allowed.sum() < len(tokenizer) // 2
        assert not processor.is_finished()
        processor.accept(token_id)
    logits = torch.zeros(vocab)
    processor.apply(logits)
    assert processor.is_finished() or torch.isfinite(logits).nonzero().flatten().tolist() == [eos]


def test_requests_with_the_same_grammar_get_independent_matchers(tokenizer):
    grammars = Grammars(tokenizer)
    grammar = _schema({"enum": ["ab", "cd"]})
    first, second = grammars.processor(grammar), grammars.processor(grammar)  # the second from the cache
    before = second.allowed_mask()
    first.accept(tokenizer.convert_tokens_to_ids('"'))
    assert torch.equal(second.allowed_mask(), before)
    assert not torch.equal(first.allowed_mask(), before)


def test_a_bitmask_row_equals_the_processors_own_mask(tokenizer):
    processor = Grammars(tokenizer).processor(_schema({"type": "object"}))
    bitmask = torch.zeros(3, processor.bitmask_words, dtype=torch.int32)
    processor.fill_bitmask(bitmask, 1)
    shifts = torch.arange(32, dtype=torch.int32)
    bits = ((bitmask[1].unsqueeze(1) >> shifts) & 1).flatten()[: len(tokenizer)].bool()
    assert torch.equal(bits, processor.allowed_mask()[: len(tokenizer)])
    assert not bitmask[0].any() and not bitmask[2].any()


def test_a_grammar_that_cannot_run_is_a_value_error(tokenizer):
    with pytest.raises(ValueError, match="grammar"):
        Grammars(tokenizer).processor('start: "a" undefined_rule')
