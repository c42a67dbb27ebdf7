"""Chat messages to prompt token ids: the tokenizer's template, ChatML when it has none."""

from __future__ import annotations

import pytest

from server.http.errors import APIError
from server.openai.chat_template import CHATML_TEMPLATE, apply_chat_template
from server.openai.schemas import ChatMessage
from tests.factories import build_tokenizer


def test_chat_template_and_chatml_default():
    tokenizer = build_tokenizer()
    messages = [ChatMessage(role="system", content="Be brief."),
                ChatMessage.model_validate({"role": "user", "content": [{"type": "text", "text": "Hel"},
                                                                        {"type": "text", "text": "lo"}]})]
    ids = apply_chat_template(tokenizer, messages)
    text = tokenizer.decode(ids)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    tokenizer.chat_template = None
    assert apply_chat_template(tokenizer, messages) == ids  # the default is ChatML too
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(APIError) as info:
        apply_chat_template(tokenizer, messages)
    assert info.value.status == 400 and "roles must alternate" in info.value.message
    assert "<|im_start|>" in CHATML_TEMPLATE
