"""Assistant-only labels from the chat template, and the token-length check."""

from __future__ import annotations

import json

import pytest

from tests.factories import build_tokenizer
from training.data import ChatRecord, DataError, TextRecord, parse_line
from training.encoding import IGNORE_INDEX, encode_record, encode_records


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _chat(*messages: dict, line: int = 1) -> ChatRecord:
    record = parse_line(json.dumps({"messages": list(messages)}), line)
    assert isinstance(record, ChatRecord)
    return record


def _learned_spans(tokenizer, ids: list[int], labels: list[int]) -> list[str]:
    spans, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


def test_only_assistant_turns_and_their_end_token_are_learned(tokenizer) -> None:
    record = _chat(
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello world!"},
        {"role": "assistant", "content": "The quick fox."},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "lazy dog"},
    )
    example = encode_record(record, tokenizer)
    rendered = tokenizer.apply_chat_template(
        [{k: m[k] for k in ("role", "content")} for m in record.messages], tokenize=False
    )
    assert tokenizer.decode(example.input_ids) == rendered
    spans = _learned_spans(tokenizer, example.input_ids, example.labels)
    assert [s.strip() for s in spans] == ["The quick fox.<|im_end|>", "lazy dog<|im_end|>"]


def test_weight_zero_assistant_turns_are_not_learned(tokenizer) -> None:
    record = _chat(
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "skip me", "weight": 0},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "learn me"},
    )
    example = encode_record(record, tokenizer)
    spans = _learned_spans(tokenizer, example.input_ids, example.labels)
    assert [s.strip() for s in spans] == ["learn me<|im_end|>"]


def test_text_records_learn_every_token_and_end_with_eos(tokenizer) -> None:
    example = encode_record(TextRecord(1, "Quiver serves adapters."), tokenizer)
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert example.labels == example.input_ids


def test_generation_tags_give_the_same_mask_as_prefix_rendering(tokenizer) -> None:
    record = _chat({"role": "user", "content": "Hello"}, {"role": "assistant", "content": "world"},
                   {"role": "user", "content": "more"}, {"role": "assistant", "content": "fox"})
    by_prefix = encode_record(record, tokenizer)
    tagged = build_tokenizer()
    tagged.chat_template = (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
        "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
        "{% endfor %}"
    )
    by_tags = encode_record(record, tagged)
    assert by_tags.input_ids == by_prefix.input_ids
    assert by_tags.labels == by_prefix.labels


def test_too_long_examples_are_reported_with_line_numbers(tokenizer) -> None:
    short = _chat({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, line=1)
    long = _chat({"role": "user", "content": "Hello world! " * 30}, {"role": "assistant", "content": "ok"}, line=7)
    with pytest.raises(DataError) as info:
        encode_records([short, long], tokenizer, max_length=40, label="train.jsonl", param="training_file")
    (issue,) = info.value.issues
    assert issue.line == 7
    assert "too long" in issue.reason and "max_length 40" in issue.reason
    assert "train.jsonl: line 7: too long" in str(info.value)
    assert len(encode_records([short], tokenizer, max_length=40, label="x")) == 1


def test_chat_data_needs_a_chat_template(tokenizer) -> None:
    plain = build_tokenizer()
    plain.chat_template = None
    record = _chat({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, line=4)
    with pytest.raises(DataError, match=r"line 4: chat example, but the model's tokenizer has no chat template"):
        encode_records([record], plain, max_length=100, label="x")


def test_templates_that_rewrite_earlier_turns_are_refused(tokenizer) -> None:
    odd = build_tokenizer()
    # Renders each message differently when it is the last one: prefixes stop being prefixes.
    odd.chat_template = (
        "{% for message in messages %}{{ message['role'] + ':' + message['content'] }}"
        "{% if loop.last %}.{% else %};{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    record = _chat({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                   {"role": "user", "content": "more"}, {"role": "assistant", "content": "fox"}, line=2)
    with pytest.raises(DataError, match=r"line 2: the chat template renders earlier turns differently"):
        encode_records([record], odd, max_length=100, label="x")


def test_a_template_that_raises_is_reported_per_line(tokenizer) -> None:
    strict = build_tokenizer()
    strict.chat_template = "{{ raise_exception('roles must alternate') }}"
    record = _chat({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}, line=9)
    with pytest.raises(DataError, match=r"line 9: the chat template rejected this conversation: .*alternate"):
        encode_records([record], strict, max_length=100, label="x")
