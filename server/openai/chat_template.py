"""Turning chat messages into prompt token ids with the tokenizer's chat template.

A tokenizer without a template gets ChatML, the format most small chat models use.
Tokenizing takes about a second per megabyte of text, so a text that cannot fit the context
is refused before it is tokenized: a token never covers more characters than the longest
entry of the vocabulary, so no text longer than the context times that length can fit.
"""

from __future__ import annotations

import functools
from typing import Any

from server.http.errors import bad_request
from server.openai.schemas import ChatMessage
from server.openai.tool_parsers import detect_parser
from server.openai.tools import ToolPlan, template_messages

# Slack for normalizers that shrink text (composing accents) before it is split into tokens.
_NORMALIZER_SLACK = 2

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def render_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the plain dicts templates expect, content flattened to one string."""
    rendered = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role, "content": message.text()}
        if message.name is not None:
            item["name"] = message.name
        if message.tool_calls:
            item["tool_calls"] = [{"id": call.id, "type": "function",
                                   "function": {"name": call.function.name, "arguments": call.function.arguments}}
                                  for call in message.tool_calls]
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        rendered.append(item)
    return rendered


def chat_template_of(tokenizer: Any) -> str:
    return getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE


def apply_chat_template(tokenizer: Any, messages: list[ChatMessage], context: int | None = None,
                        tools: ToolPlan | None = None) -> list[int]:
    """Prompt token ids for `messages`, ending with the assistant's generation prompt.

    context: the model's context length; a rendering too long to fit it is refused untokenized.
    tools:   the request's tools (server/tools.py): offered through the template, earlier calls and
             their results shaped as the template expects.
    """
    template = chat_template_of(tokenizer)
    rendered, template_tools = template_messages(render_messages(messages), template,
                                                 tools or ToolPlan(detect_parser(template)))
    extra = {"tools": template_tools} if template_tools else {}
    try:
        text = tokenizer.apply_chat_template(
            rendered, chat_template=template, add_generation_prompt=True, tokenize=False, **extra
        )
    except Exception as exc:  # a template may reject a conversation (e.g. roles out of order)
        raise bad_request(f"The chat template rejected the messages: {exc}", param="messages") from None
    if context is not None:
        check_fits_untokenized(tokenizer, text, context, "messages")
    # The template writes any BOS itself; adding special tokens again would double it.
    token_ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not token_ids:
        raise bad_request("The messages render to an empty prompt.", param="messages")
    return token_ids


def check_fits_untokenized(tokenizer: Any, text: str, context: int, param: str) -> None:
    """400 when `text` has more characters than `context` tokens could ever cover."""
    longest = _longest_token_chars(tokenizer)
    if longest and len(text) > context * longest * _NORMALIZER_SLACK:
        raise bad_request(
            f"The prompt is {len(text)} characters long, more than this model's context of {context} tokens can "
            "hold.", param=param, code="context_length_exceeded")


@functools.lru_cache(maxsize=8)
def _longest_token_chars(tokenizer: Any) -> int:
    """Characters of the vocabulary's longest entry (0: unknown, no bound)."""
    try:
        return max((len(token) for token in tokenizer.get_vocab()), default=0)
    except Exception:  # a tokenizer without a listable vocabulary: tokenize, however long
        return 0
