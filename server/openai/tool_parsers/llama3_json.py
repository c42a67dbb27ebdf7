"""Llama 3.1+ JSON tool calls: the answer is `{"name": ..., "parameters": {...}}` (several joined
by `;`), possibly after `<|python_tag|>`.

A call is recognised only at the start of the answer, as Llama writes it; an answer that starts
with a JSON object without a `name` is content.
"""

from __future__ import annotations

import json
from typing import Any

from server.openai.tool_parsers.base import (
    MAX_PARALLEL_CALLS,
    StreamingToolParser,
    ToolParser,
    lark_json,
    tools_json_lines,
)

PYTHON_TAG = "<|python_tag|>"
_SEPARATORS = " \t\r\n;"


class Llama3JSONStream(StreamingToolParser):
    args_keys = ("parameters", "arguments")

    def __init__(self, max_calls: int | None = None) -> None:
        super().__init__(max_calls)
        self._mode = "start"

    def _step(self) -> bool:
        if self._mode == "start":
            rest = self._buffer.lstrip(" \t\r\n")
            if rest.startswith(PYTHON_TAG):
                self._buffer = rest[len(PYTHON_TAG):]
                self._mode = "calls"
            elif not self._final and PYTHON_TAG.startswith(rest):  # also: nothing but blanks yet
                return False
            else:
                self._mode = "calls" if rest.startswith("{") else "text"
            return True
        if self._mode == "calls":
            if self._scanner is None:
                rest = self._buffer.lstrip(_SEPARATORS)
                if not rest:
                    if self._final:
                        self._buffer, self._mode = "", "text"
                        return True
                    return False
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
        self._emit_text(self._buffer)
        self._buffer = ""
        return False


class Llama3JSONParser(ToolParser):
    name = "llama3_json"
    stream_class = Llama3JSONStream
    args_key = "parameters"

    def render_calls(self, calls: list[tuple[str, Any]]) -> str:
        return "; ".join(json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)
                         for name, arguments in calls)

    def instructions(self, tools: list[dict[str, Any]]) -> str:
        return (
            "Given the following functions, please respond with a JSON for a function call with its proper "
            "arguments that best answers the given prompt.\n\n"
            'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
            "value}. Do not use variables.\n\n"
            f"{tools_json_lines(tools)}")

    def grammar(self, call_schemas: list[dict[str, Any]], parallel: bool) -> str:
        alternatives = " | ".join(f"call_{i}" for i in range(len(call_schemas)))
        start = f'call (";" " "? call){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else "call"
        rules = ["%llguidance {}", f"start: {start}", f"call: {alternatives}"]
        rules += [f"call_{i}: {lark_json(schema)}" for i, schema in enumerate(call_schemas)]
        return "\n".join(rules) + "\n"
