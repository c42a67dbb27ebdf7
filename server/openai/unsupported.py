"""What the OpenAI routes refuse with a clear 400 instead of ignoring.

A field that would change what the client gets (audio output, web search, reasoning effort, a
vLLM sampling option this engine lacks) is refused whenever it asks for something other than
the default, naming the field; fields that change nothing a client can see (`user`,
`metadata`, prompt-cache hints) stay accepted and ignored (docs/OPENAI.md lists them all).
The checks read the raw body before validation, so a client sending an image gets "not
supported" and not a type error about strings. `check_logprobs_cap` applies the operator's
`--max-logprobs`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from server.http.errors import bad_request

# Content parts carrying media: a text-only model cannot take them.
_MEDIA_PARTS = frozenset({"image_url", "input_image", "image", "input_audio", "audio", "file", "input_file",
                          "video_url", "video"})

_Default = Callable[[Any], bool]


def _absent(value: Any) -> bool:
    return value is None


def _false(value: Any) -> bool:
    return value is None or value is False


def _true(value: Any) -> bool:
    return value is None or value is True


def _equals(default: Any) -> _Default:
    return lambda value: value is None or (value == default and not isinstance(value, bool))


def _only_text(value: Any) -> bool:
    return value is None or (isinstance(value, list) and all(item == "text" for item in value))


def _empty(value: Any) -> bool:
    return value is None or value == {} or value == []


# field -> (is the value one that changes nothing, why it is refused otherwise)
_SHARED: dict[str, tuple[_Default, str]] = {
    "min_p": (_equals(0), "`min_p` is not supported by this server's sampler; use `top_p` or `top_k`."),
    "use_beam_search": (_false, "Beam search is not supported."),
    "length_penalty": (_equals(1), "`length_penalty` (beam search) is not supported."),
    "include_stop_str_in_output": (_false, "`include_stop_str_in_output` is not supported: stop strings are "
                                           "never part of the output."),
    "skip_special_tokens": (_true, "`skip_special_tokens: false` is not supported: special tokens are "
                                   "never part of the output."),
    "truncate_prompt_tokens": (_absent, "`truncate_prompt_tokens` is not supported: a prompt too long for the "
                                        "context is refused, never truncated."),
    "guided_json": (_absent, "`guided_json` is not supported; use `response_format` with `json_schema`."),
    "guided_regex": (_absent, "`guided_regex` is not supported."),
    "guided_choice": (_absent, "`guided_choice` is not supported; use `response_format` with a `json_schema` "
                               "holding an `enum`."),
    "guided_grammar": (_absent, "`guided_grammar` is not supported."),
    "structured_outputs": (_absent, "`structured_outputs` is not supported; use `response_format`."),
}

_CHAT: dict[str, tuple[_Default, str]] = {
    **_SHARED,
    "audio": (_absent, "Audio output is not supported: this server serves text-only models."),
    "modalities": (_only_text, "`modalities` other than `[\"text\"]` are not supported: this server serves "
                                  "text-only models."),
    "web_search_options": (_absent, "Web search is not supported."),
    "reasoning_effort": (_absent, "`reasoning_effort` is not supported: the served models' reasoning cannot be "
                                  "constrained by this server."),
    "verbosity": (_equals("medium"), "`verbosity` other than `medium` (the default) is not supported."),
    "moderation": (_absent, "Moderation is not supported."),
    "store": (_false, "`store: true` is not supported: this server does not keep chat completions for "
                      "retrieval."),
    "functions": (_absent, "`functions` (deprecated by OpenAI) is not supported; use `tools`."),
    "function_call": (_absent, "`function_call` (deprecated by OpenAI) is not supported; use `tool_choice`."),
    "best_of": (_equals(1), "`best_of` is not supported: the server does not rank candidates; use `n`."),
    "echo": (_false, "`echo` is not supported on chat completions."),
    "add_generation_prompt": (_true, "`add_generation_prompt: false` is not supported: the prompt always ends "
                                     "with the assistant's turn."),
    "continue_final_message": (_false, "`continue_final_message` is not supported."),
    "chat_template": (_absent, "A per-request `chat_template` is not supported; the server's template is set "
                               "with `quiver serve --chat-template`."),
    "chat_template_kwargs": (_empty, "`chat_template_kwargs` is not supported."),
    "documents": (_absent, "`documents` is not supported."),
}

_COMPLETION: dict[str, tuple[_Default, str]] = {**_SHARED}


def refuse_unsupported_chat(body: dict[str, Any]) -> None:
    """400 for a chat request that asks for something this server would otherwise ignore."""
    _refuse_fields(body, _CHAT)
    refuse_content_parts(body.get("messages"))


def refuse_unsupported_completion(body: dict[str, Any]) -> None:
    """400 for a legacy completion request that asks for something this server would otherwise ignore."""
    _refuse_fields(body, _COMPLETION)


def check_logprobs_cap(value: int | None, cap: int, param: str) -> None:
    """400 when a request asks for more alternatives per token than `quiver serve --max-logprobs` allows."""
    if value is not None and value > cap:
        raise bad_request(f"`{param}` is {value}; this server returns at most {cap} alternatives per token "
                          "(--max-logprobs).", param=param, code="invalid_value")


def _refuse_fields(body: dict[str, Any], table: dict[str, tuple[_Default, str]]) -> None:
    for name, (is_default, message) in table.items():
        if name in body and not is_default(body[name]):
            raise bad_request(message, param=name, code="unsupported_parameter")


def refuse_content_parts(messages: Any) -> None:
    """400 naming the first content part that is not text (`messages[i].content[j].type`)."""
    if not isinstance(messages, list):
        return  # validation says what is wrong with it
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if not isinstance(kind, str) or kind == "text":
                continue
            reason = ("this server serves text-only models" if kind in _MEDIA_PARTS
                      else "only 'text' parts are accepted")
            raise bad_request(f"content part type {kind[:64]!r} is not supported: {reason}",
                              param=f"messages[{i}].content[{j}].type", code="unsupported_content_type")
