"""Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.

`[TOOL_CALLS]` is a special token in Mistral's tokenizers, so detokenized text usually lacks it:
an answer that starts with a JSON list of objects is read as the call list too.
"""

from __future__ import annotations

import json
from typing import Any

from server.openai.tool_parsers.base import (
    MAX_PARALLEL_CALLS,
    StreamingToolParser,
    ToolParser,
    held_prefix,
    lark_json,
    tools_json_lines,
)
from server.openai.tool_parsers.scanner import WHITESPACE

MARKER = "[TOOL_CALLS]"


class MistralStream(StreamingToolParser):
    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self._mode = "start"

    def _step(self) -> bool:
        if self._mode == "start":
            rest = self._buffer.lstrip(WHITESPACE)
            if rest.startswith("[") and not rest.startswith(MARKER[:2]):
                after = rest[1:].lstrip(WHITESPACE)
                if not after and not self._final:
                    return False
                if after.startswith("{"):
                    self._buffer = rest
                    self._mode = "open"
                    return True
            elif not self._final and (not rest or MARKER.startswith(rest)):
                return False
            self._mode = "text"
            return True
        if self._mode == "text":
            at = self._buffer.find(MARKER)
            if at >= 0:
                self._emit_text(self._buffer[:at])
                self._buffer = self._buffer[at + len(MARKER):]
                self._mode = "open"
                return True
            keep = 0 if self._final else held_prefix(self._buffer, MARKER)
            self._emit_text(self._buffer[: len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep:]
            return False
        if self._mode == "open":
            rest = self._buffer.lstrip(WHITESPACE)
            if not rest:
                return self._end_if_final()
            if not rest.startswith("["):
                self._mode = "text"
                return True
            self._buffer = rest[1:]
            self._mode = "items"
            return True
        # items
        if self._scanner is None:
            rest = self._buffer.lstrip(WHITESPACE + ",")
            if not rest:
                return self._end_if_final()
            if rest.startswith("]"):
                self._buffer = rest[1:]
                self._mode = "text"
                return True
            if not rest.startswith("{"):
                self._mode = "text"
                return True
            self._buffer = rest
            self._start_call()
        closed = self._scan_call()
        if closed is None:
            return False
        if not closed:
            self._mode = "text"
        return True

    def _end_if_final(self) -> bool:
        if self._final:
            self._buffer, self._mode = "", "text"
            return True
        return False


class MistralParser(ToolParser):
    name = "mistral"
    stream_class = MistralStream

    def render_calls(self, calls: list[tuple[str, Any]]) -> str:
        return MARKER + json.dumps([{"name": name, "arguments": arguments} for name, arguments in calls],
                                   ensure_ascii=False)

    def instructions(self, tools: list[dict[str, Any]]) -> str:
        return (
            "You can call the following functions:\n"
            f"{tools_json_lines(tools)}\n\n"
            f"To call functions, answer with {MARKER} followed by a JSON list of calls: "
            f'{MARKER}[{{"name": <function-name>, "arguments": <args-json-object>}}]')

    def grammar(self, call_schemas: list[dict[str, Any]], parallel: bool) -> str:
        alternatives = " | ".join(f"call_{i}" for i in range(len(call_schemas)))
        calls = f'call ("," " "? call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else "call"
        rules = ["%llguidance {}", f'start: "[" {calls} "]"', f"call: {alternatives}"]
        rules += [f"call_{i}: {lark_json(schema)}" for i, schema in enumerate(call_schemas)]
        return "\n".join(rules) + "\n"
