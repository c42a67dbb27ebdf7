"""Tool-call formats by name, and the one a chat template implies.

`--tool-call-parser NAME` picks one for every model; otherwise the chat template decides:
`[TOOL_CALLS]` means Mistral, `<|python_tag|>` or an `ipython` role means Llama 3.1 JSON, and
anything else (`<tool_call>`, or a template that knows nothing of tools) Hermes, the format the
fallback tool prompt teaches.
"""

from __future__ import annotations

from server.openai.tool_parsers.base import (
    ParsedOutput,
    StreamingToolParser,
    ToolCall,
    ToolCallDelta,
    ToolParser,
)
from server.openai.tool_parsers.hermes import HermesParser
from server.openai.tool_parsers.llama3_json import Llama3JSONParser
from server.openai.tool_parsers.mistral import MistralParser

PARSERS: dict[str, type[ToolParser]] = {
    HermesParser.name: HermesParser,
    Llama3JSONParser.name: Llama3JSONParser,
    MistralParser.name: MistralParser,
}

__all__ = ["PARSERS", "ParsedOutput", "StreamingToolParser", "ToolCall", "ToolCallDelta", "ToolParser",
           "detect_parser", "parser_named"]


def parser_named(name: str) -> ToolParser:
    """The parser called `name`; ValueError listing the known names otherwise."""
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of {', '.join(sorted(PARSERS))}") from None


def detect_parser(chat_template: str | None) -> ToolParser:
    """The format a chat template's model writes its calls in."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return MistralParser()
    if "<|python_tag|>" in template or "ipython" in template:
        return Llama3JSONParser()
    return HermesParser()
