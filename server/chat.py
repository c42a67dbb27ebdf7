"""Turning chat messages into prompt token ids with the tokenizer's chat template.

A tokenizer without a template gets ChatML, the format most small chat models use.
"""

from __future__ import annotations

from typing import Any

from server.errors import bad_request
from server.schemas import ChatMessage

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
        rendered.append(item)
    return rendered


def apply_chat_template(tokenizer: Any, messages: list[ChatMessage]) -> list[int]:
    """Prompt token ids for `messages`, ending with the assistant's generation prompt."""
    template = getattr(tokenizer, "chat_template", None) or CHATML_TEMPLATE
    try:
        text = tokenizer.apply_chat_template(
            render_messages(messages), chat_template=template, add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # a template may reject a conversation (e.g. roles out of order)
        raise bad_request(f"The chat template rejected the messages: {exc}", param="messages") from None
    # The template writes any BOS itself; adding special tokens again would double it.
    token_ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not token_ids:
        raise bad_request("The messages render to an empty prompt.", param="messages")
    return token_ids
