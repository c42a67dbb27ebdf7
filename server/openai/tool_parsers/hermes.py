"""Hermes / Qwen: each call is `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.

Text may come before, between and after calls; it is content.
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

START = "<tool_call>"
END = "</tool_call>"


class HermesStream(StreamingToolParser):
    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self._mode = "text"

    def _step(self) -> bool:
        if self._mode == "text":
            at = self._buffer.find(START)
            if at >= 0:
                self._emit_text(self._buffer[:at])
                self._buffer = self._buffer[at + len(START):]
                self._start_call(START)
                self._mode = "call"
                return True
            keep = 0 if self._final else held_prefix(self._buffer, START)
            self._emit_text(self._buffer[: len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep:]
            return False
        if self._mode == "call":
            closed = self._scan_call()
            if closed is None:
                return False
            if closed:
                self._mode = "end"
            else:  # not a call after all: the marker is plain text
                self._emit_text(START)
                self._buffer = self._buffer[len(START):]
                self._mode = "text"
            return True
        rest = self._buffer.lstrip(" \t\r\n")
        if rest.startswith(END):
            self._buffer = rest[len(END):]
        elif END.startswith(rest):  # the end tag, cut short or still coming
            if not self._final:
                return False
            self._buffer = ""
        self._mode = "text"
        return True


class HermesParser(ToolParser):
    name = "hermes"
    stream_class = HermesStream

    def render_calls(self, calls: list[tuple[str, Any]]) -> str:
        return "\n".join(
            f"{START}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{END}"
            for name, arguments in calls)

    def instructions(self, tools: list[dict[str, Any]]) -> str:
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
            f"{tools_json_lines(tools)}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            f"{START}{END} XML tags:\n{START}\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n'
            f"{END}")

    def grammar(self, call_schemas: list[dict[str, Any]], parallel: bool) -> str:
        alternatives = " | ".join(f"call_{i}" for i in range(len(call_schemas)))
        start = f'call ("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else "call"
        rules = [
            "%llguidance {}",
            f"start: {start}",
            f'call: "{START}\\n" ({alternatives}) "\\n{END}"',
        ]
        rules += [f"call_{i}: {lark_json(schema)}" for i, schema in enumerate(call_schemas)]
        return "\n".join(rules) + "\n"
