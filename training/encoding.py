"""Records to token ids and labels: assistant-only loss through the tokenizer's chat template.

The label mask comes from the template itself, so what is learned is exactly what the
server will render at inference. Where the template marks assistant text with
`{% generation %}`, transformers returns the mask (`return_assistant_tokens_mask`).
Otherwise (ChatML and most templates) each assistant turn is located by rendering
prefixes: the conversation up to the turn with the generation prompt marks where the
answer starts, the conversation through the turn marks where it ends (its end-of-turn
token included, so the model learns to stop). A template whose prefixes are not prefixes
of the whole conversation cannot be masked this way, and says so.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from training.data import MAX_REPORTED_ISSUES, ChatRecord, DataError, DataIssue, Record, TextRecord

IGNORE_INDEX = -100
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class Example:
    line: int
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken
    segments: tuple[int, ...] = ()  # packed: the lengths of the examples laid end to end

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class _Bad(ValueError):
    pass


def encode_records(
    records: Sequence[Record], tokenizer: Any, max_length: int, label: str, param: str | None = None,
    truncate: bool = False,
) -> list[Example]:
    """Encode every record, or raise a DataError naming each line that cannot be trained on.

    truncate: an example longer than `max_length` keeps its first `max_length` tokens (and
    their labels) instead of being an error.
    """
    examples: list[Example] = []
    issues: list[DataIssue] = []
    total = 0
    for record in records:
        try:
            example = encode_record(record, tokenizer)
            if truncate and len(example.input_ids) > max_length:
                example = Example(example.line, example.input_ids[:max_length], example.labels[:max_length])
            if len(example.input_ids) > max_length:
                raise _Bad(f"too long: {len(example.input_ids)} tokens, more than max_length {max_length} "
                           "(shorten the example or raise --max-length)")
            if example.num_trained == 0:
                raise _Bad("no token to learn from after " + ("truncation" if truncate else "tokenization"))
        except _Bad as bad:
            total += 1
            if len(issues) < MAX_REPORTED_ISSUES:
                issues.append(DataIssue(record.line, str(bad)))
            continue
        examples.append(example)
    if issues:
        raise DataError(label, issues, total, param=param)
    return examples


def encode_record(record: Record, tokenizer: Any) -> Example:
    if isinstance(record, TextRecord):
        ids, labels = _encode_text(record.text, tokenizer)
    else:
        ids, labels = _encode_chat(record, tokenizer)
    return Example(record.line, ids, labels)


def _encode_text(text: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)  # a document ends: the model learns where text stops
    return ids, list(ids)


def _encode_chat(record: ChatRecord, tokenizer: Any) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise _Bad("chat example, but the model's tokenizer has no chat template "
                   "(use {\"text\": ...} examples or a model with a chat template)")
    messages = [{"role": m["role"], "content": m["content"]} for m in record.messages]
    weights = [m["weight"] for m in record.messages]
    if _GENERATION_TAG.search(str(tokenizer.chat_template)) and all(weights):
        return _encode_with_generation_mask(messages, tokenizer)
    return _encode_by_prefixes(messages, weights, tokenizer)


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja's TemplateError, or a template's own raise_exception
        raise _Bad(f"the chat template rejected this conversation: {exc}") from None
    return str(text)


def _encode_by_prefixes(
    messages: list[dict[str, str]], weights: list[int], tokenizer: Any
) -> tuple[list[int], list[int]]:
    full = _render(tokenizer, messages, False)
    spans: list[tuple[int, int]] = []
    for i, (message, weight) in enumerate(zip(messages, weights, strict=True)):
        if message["role"] != "assistant" or not weight:
            continue
        start = _render(tokenizer, messages[:i], True)
        end = _render(tokenizer, messages[: i + 1], False)
        if not (full.startswith(end) and end.startswith(start)):
            raise _Bad(
                "the chat template renders earlier turns differently once later ones follow, so "
                "assistant tokens cannot be located by prefix; use a template with {% generation %} tags"
            )
        spans.append((len(start), len(end)))
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for index, (token_start, _token_end) in enumerate(encoding["offset_mapping"]):
        if any(lo <= token_start < hi for lo, hi in spans):
            labels[index] = ids[index]
    return ids, labels


def _encode_with_generation_mask(messages: list[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[int]]:
    try:
        encoding = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
    except Exception as exc:
        raise _Bad(f"the chat template rejected this conversation: {exc}") from None
    ids = list(encoding["input_ids"])
    mask = list(encoding["assistant_masks"])
    return ids, [tok if keep else IGNORE_INDEX for tok, keep in zip(ids, mask, strict=True)]
